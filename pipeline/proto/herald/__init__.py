"""Generated from proto/ by devtools/gen_proto.py (make proto). Do not edit."""
