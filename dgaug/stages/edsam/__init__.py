"""ED-SAM: adversarial diffusion sampling of real images, bounded by the transport transformation."""
