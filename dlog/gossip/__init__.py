"""dlog.gossip"""
