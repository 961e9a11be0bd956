"""Serving: the OpenAI API over base + adapters."""
