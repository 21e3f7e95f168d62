"""What every layer shares: user-facing errors, command-line plumbing, paths, images, devices and meshes."""
