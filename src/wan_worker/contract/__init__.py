"""The contract: vocabularies, the wire models, job building, error codes and settings.

Imports nothing else of the package."""
