"""pipefusion package."""
