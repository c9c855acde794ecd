"""The operator dashboard: views, forms, access rules and charts. Pages are templates built from
named partials.
"""
