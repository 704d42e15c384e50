"""seer_attn.eval"""
