"""The built-in synthetic demo corpus and its own small CLIP teacher."""
