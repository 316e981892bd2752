"""Model files in and out, for jobs/convert.py: the paper's checkpoints, diffusers VAEs and calibration,
each a function that checks its paths, converts, writes and says in lines what it wrote."""
