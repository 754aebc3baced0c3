"""Text sources: local files and built-in public-domain texts that resolve on a fresh machine."""
