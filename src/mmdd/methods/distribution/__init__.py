"""Distribution matching (DM, MDM): the objective, the encoders drawn each iteration, maximum mean discrepancy."""
