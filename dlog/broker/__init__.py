"""dlog.broker"""
