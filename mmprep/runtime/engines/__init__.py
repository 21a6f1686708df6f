"""Engines run the same per-chunk work (:func:`mmprep.pack.job.pack_chunk`) on a process pool or on Ray."""
