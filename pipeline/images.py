"""Image decoding for the CLIP teacher: a Dataset of image files for DataLoader workers (PIL, with JPEG
draft mode), and an alternative that decodes JPEG bytes on the GPU in batches (torchvision.io, nvjpeg)."""
from __future__ import annotations

import math

import torch
from PIL import Image, UnidentifiedImageError

JPEG_MAGIC = b"\xff\xd8"


class ImageFiles(torch.utils.data.Dataset):
    """Item i -> (tensor, reason): reason is "" when the image decoded, else why it failed (tensor is zeros).

    raw=False: the open_clip `preprocess` runs here, in the worker, on a PIL image decoded at reduced size
    when `draft` (JPEG only: PIL decodes at 1/2, 1/4 or 1/8 scale directly from the DCT).
    raw=True: JPEG files are returned as their bytes (uint8 [n]) for batched decoding on the GPU; other
    formats as decoded uint8 [3, H, W] RGB tensors.
    """

    def __init__(self, paths: list[str], preprocess, size: int, draft: bool = True, raw: bool = False):
        self.paths, self.preprocess, self.size, self.draft, self.raw = paths, preprocess, size, draft, raw

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.paths[i]
        try:
            if self.raw:
                with open(path, "rb") as f:
                    data = f.read()
                if data[:2] == JPEG_MAGIC:
                    return torch.frombuffer(bytearray(data), dtype=torch.uint8), ""
                return _pil_to_uint8(_open_rgb(path, None)), ""
            return self.preprocess(_open_rgb(path, self.size if self.draft else None)), ""
        except FileNotFoundError:
            return None, "missing file"
        except UnidentifiedImageError:
            return None, "not an image (PIL cannot identify it)"
        except (OSError, ValueError, SyntaxError) as e:
            return None, f"unreadable image: {e}"

    def collate(self, batch):
        reasons = [reason for _, reason in batch]
        if self.raw:
            return [x for x, _ in batch], reasons
        shape = next((x.shape for x, r in batch if not r), (3, self.size, self.size))
        return torch.stack([x if not r else torch.zeros(shape) for x, r in batch]), reasons


def _open_rgb(path: str, draft_size: int | None) -> Image.Image:
    img = Image.open(path)
    if draft_size is not None and img.format == "JPEG":
        img.draft("RGB", (draft_size, draft_size))   # keeps both sides >= draft_size
    img.load()
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        # transparent pixels over white, as a viewer shows them, not over their hidden colour
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB")


def _pil_to_uint8(img: Image.Image) -> torch.Tensor:
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3).permute(2, 0, 1)


def decode_on_device(items: list, reasons: list[str], size: int, mean, std, device: str) -> torch.Tensor:
    """JPEG bytes and uint8 images -> normalised [n, 3, size, size] on `device`, like open_clip's eval transform
    (shortest side to `size` with bicubic antialiasing, centre crop). Failures are marked in `reasons`."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import functional as F
    jpeg = [i for i, (x, r) in enumerate(zip(items, reasons)) if not r and x.dim() == 1]
    decoded: dict[int, torch.Tensor] = {}
    if jpeg:
        try:
            for i, img in zip(jpeg, decode_jpeg([items[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)):
                decoded[i] = img
        except RuntimeError:   # one bad file fails the batch: find it one by one
            for i in jpeg:
                try:
                    decoded[i] = decode_jpeg(items[i], mode=ImageReadMode.RGB, device=device)
                except RuntimeError as e:
                    reasons[i] = f"unreadable image: {e}"
    out = torch.zeros(len(items), 3, size, size, device=device)
    m = torch.tensor(mean, device=device).view(3, 1, 1)
    s = torch.tensor(std, device=device).view(3, 1, 1)
    for i, (x, r) in enumerate(zip(items, reasons)):
        if r:
            continue
        img = decoded.get(i, x).to(device, non_blocking=True)
        h, w = img.shape[-2:]
        scale = size / min(h, w)
        img = F.resize(img, [max(size, math.floor(h * scale + 0.5)), max(size, math.floor(w * scale + 0.5))],
                       interpolation=F.InterpolationMode.BICUBIC, antialias=True)
        img = F.center_crop(img, [size, size])
        out[i] = (img.float() / 255 - m) / s
    return out
