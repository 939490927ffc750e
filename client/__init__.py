"""What runs on a hospital's or home hub's node: data, preprocessing, local training, the Flower ClientApp."""
