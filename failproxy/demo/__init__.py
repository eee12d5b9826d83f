"""`failproxy demo`: a three-box cluster on this machine, failproxy beside the
seed's nginx configuration, with its demo apps."""
