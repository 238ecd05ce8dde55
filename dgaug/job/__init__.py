"""The job: the manifest with every section, the stage registry, and the composition that runs it."""
