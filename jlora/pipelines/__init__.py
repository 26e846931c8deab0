"""JAX image-generation pipelines (SD 1.5, SDXL, Flux) built on jlora's loaders."""
