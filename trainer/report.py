"""A self-contained HTML page for one evaluation: retrieval table, sample queries, keyword rankings and
training curves, with thumbnails, audio and plots inlined as data: URIs."""
import base64
import html
import io
import math
import os
import re
from pathlib import Path

import numpy as np
import torch

from cache.manifest import atomic_write_text
from trainer.metrics import RETRIEVAL_PAIRS, keyword_chance, keyword_relevance, retrieval_chance
from trainer.plots import read_log

THUMB_PX = 96                         # longest side of an image thumbnail, pixels
TOP_IMAGES = 5                        # images shown per sample query
TOP_UTTERANCES = 10                   # utterances shown per keyword
MAX_AUDIO_BYTES = 4 * 1024 * 1024     # larger files get a placeholder: base64 would bloat the page
AUDIO_MIME = {".wav": "audio/wav", ".flac": "audio/flac", ".mp3": "audio/mpeg", ".ogg": "audio/ogg"}
KEYWORD_ROWS = (("mAP", "mAP"), ("micro_AP", "micro AP"), ("P@10", "P@10"), ("P@N", "P@N"), ("EER", "EER"))

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .8em 0; }
th, td { padding: .3em .8em; text-align: right; border-bottom: 1px solid #eee; }
th:first-child, td:first-child { text-align: left; }
td.chance, th.chance { color: #888; }
.counts { color: #555; }
.query { border: 1px solid #e3e3e3; border-radius: 6px; padding: .6em .9em; margin: .8em 0; }
.query .text { font-size: 1.05em; margin-bottom: .3em; }
.query .meta { color: #777; font-size: .9em; }
.thumbs { display: flex; gap: .6em; flex-wrap: wrap; margin-top: .5em; }
figure { margin: 0; text-align: center; font-size: .85em; color: #555; }
figure img { display: block; border: 3px solid #ddd; border-radius: 4px; }
figure.correct img { border-color: #2e9d3a; }
.placeholder { width: 96px; min-height: 72px; border: 2px dashed #c66; color: #a33; font-size: .75em;
               padding: 3px; overflow-wrap: anywhere; text-align: left; }
span.placeholder { display: inline-block; width: auto; min-height: 0; }
.keywords { display: grid; grid-template-columns: repeat(auto-fill, minmax(330px, 1fr)); gap: .8em; }
.keyword { border: 1px solid #e3e3e3; border-radius: 6px; padding: .5em .8em; }
.keyword h3 { margin: .1em 0 .3em; font-size: 1.05em; }
.keyword ol { margin: 0; padding-left: 1.6em; }
.ok { color: #2e9d3a; } .bad { color: #c0392b; }
mark { background: #fff2a8; }
img.plot { max-width: 100%; }
"""


def _num(x: float | None, digits: int = 1) -> str:
    """Number as text; None and NaN print as a dash."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "&ndash;"
    return f"{x:.{digits}f}"


def _array(x) -> np.ndarray:
    """Embedding matrix (numpy or torch) -> float32 [N, D] with unit rows."""
    a = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def _strings(xs) -> list[str]:
    """Ids or transcripts (list, numpy array, bytes from HDF5) -> list of str."""
    return [x.decode() if isinstance(x, bytes) else str(x) for x in xs]


def _placeholder(what: str, path: str | None, reason: str, inline: bool = False) -> str:
    tag = "span" if inline else "div"
    where = f"<br>{html.escape(path)}" if path else ""
    return f'<{tag} class="placeholder">{html.escape(what)}: {html.escape(reason)}{where}</{tag}>'


def _thumbnail(path: str | None, image_id: str, cache: dict[str, str]) -> str:
    """<img> with a base64 JPEG thumbnail, or a placeholder naming the path when it cannot be read."""
    if image_id in cache:
        return cache[image_id]
    if path is None:
        out = _placeholder("image", None, f"no path for image id {image_id}")
    else:
        from PIL import Image, UnidentifiedImageError
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                im.thumbnail((THUMB_PX, THUMB_PX))
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=85)
            data = base64.b64encode(buf.getvalue()).decode("ascii")
            out = f'<img src="data:image/jpeg;base64,{data}" alt="{html.escape(image_id)}">'
        except (OSError, UnidentifiedImageError) as e:
            out = _placeholder("image", path, type(e).__name__)
    cache[image_id] = out
    return out


def _audio_player(path: str | None, utt_id: str) -> str:
    """<audio controls> with the file's bytes inlined (no decoding here), or a placeholder."""
    if path is None:
        return _placeholder("audio", None, f"no path for utterance {utt_id}", inline=True)
    mime = AUDIO_MIME.get(Path(path).suffix.lower(), "audio/wav")
    try:
        size = os.path.getsize(path)
        if size > MAX_AUDIO_BYTES:
            return _placeholder("audio", path, f"{size / 2**20:.1f} MiB is too large to inline", inline=True)
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    except OSError as e:
        return _placeholder("audio", path, type(e).__name__, inline=True)
    return f'<audio controls preload="none" src="data:{mime};base64,{data}"></audio>'


def _summary_section(results: dict, emb: dict, relevance: np.ndarray | None) -> str:
    """(1) the six-way retrieval table and the keyword-spotting figures, with chance levels."""
    counts = results.get("counts") or {}
    parts = ["<h2>Summary</h2>"]
    if counts:
        parts.append('<p class="counts">' + " &middot; ".join(
            f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in counts.items()) + "</p>")
    retrieval = results.get("retrieval") or {}
    chance = retrieval_chance(_strings(emb["audio_image_ids"]), len(emb["image_ids"]),
                              _strings(emb["text_image_ids"]) if "text_image_ids" in emb else None)
    rows = []
    for pair in RETRIEVAL_PAIRS:
        r = retrieval.get(pair, {})
        cells = "".join(f"<td>{_num(r.get(key))}</td>" for key in ("R@1", "R@5", "R@10"))
        ranks = f"<td>{_num(r.get('median_rank'))}</td><td>{_num(r.get('mean_rank'))}</td>"
        chance_cells = "".join(f'<td class="chance">{_num(chance[pair][k])}</td>' for k in (1, 5, 10))
        rows.append(f"<tr><td>{pair.replace('_to_', ' &rarr; ')}</td>{cells}{ranks}{chance_cells}</tr>")
    parts.append('<table><tr><th>retrieval</th><th>R@1</th><th>R@5</th><th>R@10</th><th>median rank</th>'
                 '<th>mean rank</th><th class="chance">chance R@1</th><th class="chance">R@5</th>'
                 '<th class="chance">R@10</th></tr>' + "".join(rows) + "</table>")

    kws = results.get("keyword_spotting")
    if not kws:
        parts.append("<p>No keyword-spotting results.</p>")
        return "\n".join(parts)
    chance_of: dict[str, float | None] = {"mAP": None, "micro_AP": None, "P@10": None, "P@N": None,
                                          "EER": 50.0}
    n_keywords = f"{results.get('counts', {}).get('keywords', '?')} keywords"
    if relevance is not None:        # chance needs the transcripts and keywords in emb
        n_keywords = f"{int(relevance.any(axis=0).sum())} of {n_keywords} occur"
        kw_chance = keyword_chance(relevance)
        micro_chance = 100.0 * float(relevance.mean())   # micro AP: the whole matrix, unscored keywords too
        chance_of |= {"mAP": kw_chance, "micro_AP": micro_chance, "P@10": kw_chance, "P@N": kw_chance}
    rows = [f'<tr><td>{label}</td><td>{_num(kws.get(key))}</td><td class="chance">{_num(chance_of[key])}</td>'
            f"</tr>" for key, label in KEYWORD_ROWS]
    parts.append(f'<table><tr><th>keyword spotting ({n_keywords})</th><th>%</th>'
                 f'<th class="chance">chance</th></tr>{"".join(rows)}</table>'
                 "<p class=\"counts\">mAP, P@10, P@N, EER: means over the keywords that occur at least once "
                 "(chance of AP: their mean frequency, approximately); micro AP: over every utterance-keyword "
                 "pair; EER: lower is better.</p>")
    return "\n".join(parts)


def _queries_section(emb: dict, audio_paths: dict[str, str], image_paths: dict[str, str],
                     n_queries: int, seed: int) -> str:
    """(2) sample utterances with their top retrieved images; the correct one outlined green."""
    audio, image = _array(emb["audio"]), _array(emb["image"])
    audio_ids, texts = _strings(emb["audio_ids"]), _strings(emb["audio_text"])
    audio_image_ids, image_ids = _strings(emb["audio_image_ids"]), _strings(emb["image_ids"])
    image_row = {k: i for i, k in enumerate(image_ids)}
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(len(audio), size=min(n_queries, len(audio)), replace=False))
    sims = audio[picks] @ image.T                                   # [n_queries, I]
    thumbs: dict[str, str] = {}
    parts = [f"<h2>Audio &rarr; image: {len(picks)} sample queries (seed {seed})</h2>"]
    for q, i in enumerate(picks):
        top = np.argsort(-sims[q], kind="stable")[:TOP_IMAGES]
        truth = image_row.get(audio_image_ids[i])
        rank = None if truth is None else int((sims[q] > sims[q, truth]).sum()) + 1
        figures = []
        for r, j in enumerate(top, start=1):
            cls = ' class="correct"' if j == truth else ""
            figures.append(f"<figure{cls}>{_thumbnail(image_paths.get(image_ids[j]), image_ids[j], thumbs)}"
                           f"<figcaption>#{r}</figcaption></figure>")
        if truth is not None and truth not in top:
            thumb = _thumbnail(image_paths.get(image_ids[truth]), image_ids[truth], thumbs)
            figures.append(f'<figure class="correct">{thumb}'
                           f"<figcaption>correct, #{rank}</figcaption></figure>")
        rank_text = ("correct image not among the candidates" if rank is None
                     else f"correct image at rank {rank}")
        parts.append(f'<div class="query"><div class="text">{html.escape(texts[i])}</div>'
                     f'<div class="meta">{html.escape(audio_ids[i])} &middot; {rank_text}</div>'
                     f"{_audio_player(audio_paths.get(audio_ids[i]), audio_ids[i])}"
                     f'<div class="thumbs">{"".join(figures)}</div></div>')
    return "\n".join(parts)


def _highlight(text: str, words: set[str]) -> str:
    """Escape text and <mark> the words of the keyword (case-insensitive, whole words)."""
    pieces = re.split(r"([^\W_]+)", text)
    return "".join(f"<mark>{html.escape(p)}</mark>" if p.lower() in words else html.escape(p) for p in pieces)


def _keywords_section(results: dict, emb: dict, relevance: np.ndarray) -> str:
    """(3) per keyword: its AP and the top-ranked utterances, marked right or wrong."""
    keywords, texts = _strings(emb["keywords"]), _strings(emb["audio_text"])
    scores = torch.from_numpy(_array(emb["audio"]) @ _array(emb["keyword"]).T)      # [N, K]
    top = torch.topk(scores, k=min(TOP_UTTERANCES, len(texts)), dim=0).indices.numpy()
    per_keyword = (results.get("keyword_spotting") or {}).get("per_keyword", {})
    cards = []
    for j, word in enumerate(keywords):
        stats = per_keyword.get(word, {})
        n_rel = stats.get("n_relevant", int(relevance[:, j].sum()))
        marks = set(re.findall(r"[^\W_]+", word.lower()))
        items = []
        for i in top[:, j]:
            ok = bool(relevance[i, j])
            sign = '<span class="ok">&#10003;</span>' if ok else '<span class="bad">&#10007;</span>'
            items.append(f"<li>{sign} {_highlight(texts[i], marks)}</li>")
        cards.append(f'<div class="keyword"><h3>{html.escape(word)} &middot; AP {_num(stats.get("AP"))} '
                     f'&middot; P@10 {_num(stats.get("P@10"))} &middot; {n_rel} relevant</h3>'
                     f"<ol>{''.join(items)}</ol></div>")
    return (f"<h2>Keyword spotting: top {TOP_UTTERANCES} utterances per keyword</h2>"
            f'<div class="keywords">{"".join(cards)}</div>')


def _read_metrics_jsonl(path: Path) -> tuple[dict[str, list[tuple[float, float]]], int]:
    """metrics.jsonl -> ({key: [(step, value), ...]} for numeric keys, number of unreadable lines)."""
    records, bad = read_log(path)
    series: dict[str, list[tuple[float, float]]] = {}
    for row in records:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, []).append((float(row["step"]), float(value)))
    return series, bad


def _panels(series: dict[str, list[tuple[float, float]]]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Keys grouped into panels: one direction's R@1, R@5 and R@10 share a panel (lines "R@1"...); any
    other key has a panel of its own."""
    panels: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for key, points in sorted(series.items()):
        panel, _, k = key.rpartition("_R@")
        if panel:
            panels.setdefault(panel + " R@K", {})[f"R@{k}"] = points
        else:
            panels[key] = {key: points}
    return panels


def _plot(series: dict[str, list[tuple[float, float]]], title: str) -> str:
    """Small panels of value vs step (see _panels), as an <img> with a base64 PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure      # no pyplot: leaves the global backend alone

    panels = _panels(series)
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 2.8 * nrows), dpi=90, layout="constrained")
    for n, (name, lines) in enumerate(panels.items()):
        ax = fig.add_subplot(nrows, ncols, n + 1)
        for label, points in sorted(lines.items(), key=lambda item: (len(item[0]), item[0])):  # R@1 R@5 R@10
            steps, values = zip(*sorted(points))
            ax.plot(steps, values, marker="." if len(points) < 30 else None, linewidth=1.2, label=label)
        if len(lines) > 1:
            ax.legend(fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.grid(alpha=0.3)
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img class="plot" alt="{html.escape(title)}" src="data:image/png;base64,{data}">'


def _curves_section(run_dir: Path | None) -> str:
    """(4) training curves from run_dir/metrics.jsonl, or a line saying why there are none."""
    head = "<h2>Training curves</h2>"
    if run_dir is None:
        return head + "<p>No run directory was given, so there are no training curves.</p>"
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return head + f"<p>No training curves: {html.escape(str(path))} does not exist.</p>"
    series, bad = _read_metrics_jsonl(path)
    parts = [head, f'<p class="counts">From {html.escape(str(path))}'
             + (f"; {bad} unreadable lines skipped" if bad else "") + ".</p>"]
    train = {k: v for k, v in series.items() if not k.startswith("dev/")}
    dev = {k: v for k, v in series.items() if k.startswith("dev/")}
    for name, group in (("training", train), ("dev", dev)):
        if group:
            parts.append(f"<h3>{name}</h3>{_plot(group, name)}")
    if not series:
        parts.append("<p>The file holds no numeric values besides the step.</p>")
    return "\n".join(parts)


def write_report(path: str | Path, results: dict, emb: dict, audio_paths: dict[str, str],
                 image_paths: dict[str, str], run_dir: Path | None = None, n_queries: int = 8,
                 seed: int = 0) -> Path:
    """Write the evaluation report as one self-contained HTML file and return its path.

    results: the evaluation JSON ({"split", "counts", "retrieval", "keyword_spotting"}); emb: arrays
    audio [N, D], audio_ids, audio_image_ids, audio_text, image [I, D], image_ids, text, text_ids,
    text_image_ids, keyword [K, D], keywords (the keyword pair is optional); audio_paths / image_paths:
    utterance id / image id -> file. Unreadable media become placeholders naming the path.
    """
    required = ("audio", "audio_ids", "audio_image_ids", "audio_text", "image", "image_ids")
    missing = [k for k in required if k not in emb]
    if missing:
        raise ValueError(f"emb lacks {missing}: pass the arrays the evaluation used "
                         "(listed in write_report's docstring)")
    if len(emb["audio"]) == 0:
        raise ValueError("emb['audio'] is empty: there is nothing to report on")
    has_keywords = "keyword" in emb and "keywords" in emb and len(emb["keywords"]) > 0
    relevance = (keyword_relevance(_strings(emb["audio_text"]), _strings(emb["keywords"]))
                 if has_keywords else None)
    split = html.escape(str(results.get("split", "?")))
    sections = [_summary_section(results, emb, relevance),
                _queries_section(emb, audio_paths, image_paths, n_queries, seed),
                _keywords_section(results, emb, relevance) if relevance is not None
                else "<h2>Keyword spotting</h2><p>No keywords in this evaluation.</p>",
                _curves_section(run_dir)]
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>clipspeech evaluation: {split}</title><style>{CSS}</style></head>\n"
            f"<body><h1>clipspeech evaluation: {split} split</h1>\n"
            + "\n".join(sections) + "\n</body></html>\n")
    path = Path(path)
    atomic_write_text(path, page)          # a reader never sees half a report
    return path
