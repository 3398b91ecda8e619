"""Analysis of a finished run: pure functions over its weights and activations (logit effects,
similarity between features, neurons and SAEs) for the feature-analysis pass and its verbs."""
