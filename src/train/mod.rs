//! Training small classifiers, standard and adversarial.
