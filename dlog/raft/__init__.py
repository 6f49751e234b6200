"""dlog.raft"""
