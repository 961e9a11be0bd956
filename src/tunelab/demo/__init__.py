"""The embedded demo: a tiny model of a real architecture, built and fine-tuned offline on 2 CPU cores."""
