"""Turns a CamVid folder (Kaggle or SegNet layout) into sharded TFRecords plus a manifest.

No Apache Beam: plain multiprocessing, one shard per task, each shard written under a temporary
name and renamed when complete, the manifest written last.
"""
