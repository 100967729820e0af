"""The engine's machinery: requests, scheduling, the KV pages, step inputs, the model runner
and its device state, sampling, and turning sampled tokens into outputs."""
