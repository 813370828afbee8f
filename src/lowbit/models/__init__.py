"""lowbit.models"""
