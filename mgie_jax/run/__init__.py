"""A run of the recipe: the model and batch a config describes, the checks made before building them, and a run on disk."""
