"""seer_attn.hub_cards"""
