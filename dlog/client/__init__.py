"""dlog.client"""
