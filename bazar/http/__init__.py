"""HTTP, the edge of every Bazar process: the JSON app and its routes (`app`), reading
requests (`request`), the hardened server (`server`) and the client to its peers
(`client`). Domain errors become statuses here and nowhere else."""
