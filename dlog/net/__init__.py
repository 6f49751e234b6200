"""dlog.net"""
