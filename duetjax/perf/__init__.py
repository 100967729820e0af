"""The performance model, free of JAX: the roofline, its online correction, the mode optimizer
and the token budget."""
