"""`usjepa study`: pretrain every arm of a comparison on the same data, steps and seeds, probe
each on labelled tasks, and write the table with the compute each arm spent."""
