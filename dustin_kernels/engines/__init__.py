"""Adapters that plug the ops into serving engines (vLLM)."""
