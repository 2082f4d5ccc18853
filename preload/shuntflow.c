/* placeholder, replaced by the real library */
int sf_placeholder;
