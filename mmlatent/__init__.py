"""mmlatent."""
