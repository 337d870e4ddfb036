"""fusion_pass"""
