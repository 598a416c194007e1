"""Generation: one loop (prefill, decode step, sampling, stops, streaming) over any latent cache."""
