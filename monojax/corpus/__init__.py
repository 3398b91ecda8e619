"""The default corpus: real text from registry packages, built once into Pile-format shards."""
