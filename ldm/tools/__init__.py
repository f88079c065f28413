"""Command-line tools: ``python -m ldm.tools.make_shards``, ``export_shapes``, ``cache_latents``."""
