"""The FeatureInspector/TextInspector web site of a finished run: the static site, live text activations and the local server."""
