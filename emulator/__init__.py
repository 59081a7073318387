"""Model surgery and training for offsite tuning: split, layer drop, plug-in, distillation. No networking."""
