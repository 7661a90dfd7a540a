"""Integrations with other training frameworks (``dpclip.integrations.transformers``)."""
