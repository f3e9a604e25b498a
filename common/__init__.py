"""The plumbing every door and package uses: errors, atomic files, flags, devices, video I/O and weight files.

It imports nothing else of the project, so anything may import it.
"""
