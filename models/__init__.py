"""FER architectures and their registry. Imports torch only."""
