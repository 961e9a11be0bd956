"""Model: load weights and tokenizer, repair known quirks, attach adapters."""
