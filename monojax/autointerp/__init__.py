"""Automated interpretability of a run's features and neurons: explain each one from its examples,
then score the explanation by simulation, detection, fuzzing and logit prediction
(python -m monojax.autointerp). Backends: an offline baseline (no model), Anthropic's Messages API,
or any OpenAI-compatible chat endpoint."""
