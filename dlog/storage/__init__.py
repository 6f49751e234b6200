"""dlog.storage"""
