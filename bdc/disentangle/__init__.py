"""Disentangle (paper part D, DisenLoRA): the explored data is heterogeneous, so it is embedded
and clustered, and one LoRA expert is trained per cluster.

``embedding``: sentence-transformers embeddings, L2-normalised and cached by (model, text);
``clustering``: cosine k-means with k fixed or chosen by silhouette, and the measurements that
say whether the clusters are worth an expert each; ``partition`` the explored data in
clusters; ``routing`` a new problem to its cluster from its text; ``experts`` one LoRA per
cluster and one on all the data; ``merging`` the static merges and Arrow; ``registry`` the
expert set as an MLflow registered model.
"""
