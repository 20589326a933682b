"""Code shared by the stages: settings, storage, dataset specs, features and model."""
