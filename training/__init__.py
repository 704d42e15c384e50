"""seer_attn.training"""
