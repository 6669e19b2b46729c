"""clipspeech: what the pipeline computes once."""
