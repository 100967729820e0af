"""DuetServe's split mode: the MPS daemon, the prefill and decode worker processes, and the
split executor that drives them."""
