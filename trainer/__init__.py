"""The audio encoder, its loss, sampler, training loop and metrics; reads only cache/."""
